"""The embedded redis-server + PostgreSQL of `pointauth dev` and the tests, and demo data."""
