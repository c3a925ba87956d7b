"""The CML API v2 client: typed objects, pagination, errors, retries, redaction of secrets."""
