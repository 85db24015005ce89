"""Gates: evaluations of a student against its teacher and baseline on held-out cases."""
