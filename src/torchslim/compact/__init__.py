"""Compact storage: weight sharing (k-means codebooks) and an entropy-coded artifact format.

`codebook` registers the ``share_weights`` method ``kmeans``; `sharing` holds the model transform, `entropy` the
coding and `artifact` the ``model.tslim`` format and its `CompactDeployable`. Nothing is imported here, so that
importing `torchslim` stays light.
"""
