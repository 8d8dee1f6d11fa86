"""The decode worker: reserves blocks for a handed-off request, receives its KV over
the fabric, decodes in a continuous batch and streams tokens to the router. It also
prefills locally when the router says so (colocated mode).

Public names: ``DecodeWorker``; run with ``python -m pdserve.decode SPEC_JSON``.
"""
