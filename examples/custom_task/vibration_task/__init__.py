"""An example fedgen task: machine-vibration windows from a 3-axis accelerometer."""
