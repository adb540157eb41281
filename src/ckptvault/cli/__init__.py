"""L4: the ``ckptvault`` command line."""
