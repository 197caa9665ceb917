"""Pure shared vocabulary of the domain: ids and their grammar. No I/O."""
