"""skeleton_ds: Skeleton (task-neuron localized prompt tuning) scaled with DeepSpeed ZeRO."""

__version__ = "0.2.0"
