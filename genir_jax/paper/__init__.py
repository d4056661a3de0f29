"""The paper's pipeline: the reproduce steps and the report."""
