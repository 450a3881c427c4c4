"""The Ray adapters: the only modules of qgen-ray that import Ray.

    session         connect to a local instance or a cluster; cloud keys kept out of logs
    tune_study      Ray Tune: one trial per model of a population (fractional resources)
    fanout          actor pools for the follow-up stages (measure, corrupt, landscape)
    ddp             Ray Train inside Ray Tune: one TorchTrainer per ImageNet model
    cluster_config  offline checks of a `ray up` config (Ray's schema, our security rules)

Everything they run is Ray-free code from the core (`train`, `measures`, `data`, ...);
`tests/test_layers.py` holds the core to that.
"""
