"""ASR models registered into ESPnet's ``model_choices`` (subclasses of ``ESPnetASRModel``)."""
