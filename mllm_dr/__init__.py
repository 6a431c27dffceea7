"""MLlm-DR: explainable depression recognition from interviews (Zhang et al., 2025).

Data flows one way: corpus -> features -> aspect instances -> model -> adapters.
Nothing in this package knows about Flower or the command line; ``fl_client``,
``fl_server`` and ``cli`` are thin layers over it.
"""

__version__ = "0.1.0"
