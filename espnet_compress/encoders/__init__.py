"""Encoders registered into ESPnet's ``encoder_choices``: configurations of the elastic core."""
