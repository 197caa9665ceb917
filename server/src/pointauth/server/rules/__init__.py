"""Pure earn rules over plain data: no I/O."""
