-- The CPU class each worker runs in (journal/priority.py), shown by `pointauth status`: "idle";
-- "idle, may not leave" (no right to return to the normal class); "normal, behind" (its lag
-- passed the bound); "normal". Workers of earlier releases ran in the normal class.
ALTER TABLE worker_heartbeats ADD COLUMN cpu_class text NOT NULL DEFAULT 'normal';
