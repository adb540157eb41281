"""L2: the only code that moves bytes — plan, write and commit; read and verify."""
