"""What runs inside an application pod: head and worker launchers, rendezvous, token, app HTTP."""
