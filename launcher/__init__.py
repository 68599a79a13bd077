"""Command line (`dlm`) and launchers."""
