"""The work radloop's workers do: annotator and draft writing, volume loading, NIfTI files
and SEG label maps, the viewer store, training and retraining, the review service, the outbox
dispatcher."""
