"""ratepay."""
