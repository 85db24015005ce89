"""The judge role: a model held to objective signals before its verdicts gate anything (stage ``judge``, contracts/judge.yaml)."""
