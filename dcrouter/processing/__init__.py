"""The processing chain between end of DATA and the 250 reply."""
