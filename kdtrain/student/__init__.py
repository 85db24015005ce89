"""The student: initialisation from the teacher (later: the export-friendly module)."""
