"""Talking to a running cluster through its application URL, from anywhere the URL reaches.

On CML the head's application URL is the only way into the cluster from outside the project; CML
lets programs through with ``Authorization: Bearer <API key>``, and the head's HTTP server adds the
Ray token. This layer uses config and cml only, and never imports Ray (the deploy side stays light).
"""
