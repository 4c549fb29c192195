"""INT8 calibration: data sources, explicit Q/DQ, sensitivity and accuracy reports (see DESIGN.md)."""
