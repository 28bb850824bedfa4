"""studyq coordinator."""
