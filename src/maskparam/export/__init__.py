"""Export: ``to_sparse`` puts each plain ``nn.Linear`` weight in its fastest layout;
``shrink`` removes the all-zero channels of a baked model."""
