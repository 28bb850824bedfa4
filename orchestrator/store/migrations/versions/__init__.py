"""One module per schema revision, oldest first (``vNNNN_<slug>.py``)."""
