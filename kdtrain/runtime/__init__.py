"""Running converted programs: one interface, two backends (Core ML on macOS, the MIL
reference executor anywhere), and the host API that drives prefill, decode and verify."""
