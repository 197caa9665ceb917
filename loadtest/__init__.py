"""Load tools for pointauth: Locust scenarios (locustfile.py) and the benchmark (`python -m loadtest.bench`)."""
