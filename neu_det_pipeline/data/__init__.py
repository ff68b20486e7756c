"""NEU-DET data: reading, validation, splits and derived files."""
