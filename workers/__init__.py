"""studyq workers."""
