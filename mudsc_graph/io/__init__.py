"""Files in and out: checkpoints, calibration and evaluation data, Hugging Face model directories."""
