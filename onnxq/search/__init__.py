"""Choosing what runs in int8: the speed guard and its table, sensitivity and accuracy targets,
the automatic search, and Ray for calibration shards and search candidates."""
