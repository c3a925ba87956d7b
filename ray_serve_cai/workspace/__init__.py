"""The local CML workspace: an independent implementation of the CML API v2 subset.

It runs jobs and applications as local processes. It never imports the client
(`ray_serve_cai.cml`): it must catch the client's mistakes, not share them.
"""
