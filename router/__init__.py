"""The router: the OpenAI HTTP front door, the worker registry and control server,
the dispatcher that sends each request to a prefill/decode pair, and the ``pdserve``
command line.

Public names: ``create_app`` (api.py), ``Dispatcher`` (dispatcher.py),
``ZmqDispatcher`` (zmq_dispatcher.py), ``load_config`` (config.py), ``main`` (cli.py).
"""
