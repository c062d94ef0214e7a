"""The doctor: checks of KB 895853, each returning findings."""
