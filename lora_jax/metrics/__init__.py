"""Metrics by their official definitions: glue.py (GLUE), e2e.py and mteval.py (the E2E NLG challenge script)."""
