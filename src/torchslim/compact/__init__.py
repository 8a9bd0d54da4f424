"""Compact forms of weights: generated at run time (`materialize`) or shared and entropy coded (`codebook`).

`materialize` registers ``materialize: on-demand``. `codebook` registers ``share_weights: kmeans``; `sharing`
holds its model transform, `entropy` the coding and `artifact` the ``model.tslim`` format and its
`CompactDeployable`. Nothing is imported here, so that importing `torchslim` stays light.
"""
