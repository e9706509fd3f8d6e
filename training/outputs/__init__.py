"""What pellucid writes: the explanation writer, the W&B logger, the report card and its figures."""
