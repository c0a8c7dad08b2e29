"""Export: ``to_sparse`` puts each plain ``nn.Linear`` weight in its fastest layout."""
