"""The etcd v3 services as plain async functions over a :class:`~coord_server.node.Node`.

Each module exposes ``methods(node) -> list[Method]``; transports bind that list.
Services know nothing of gRPC or HTTP: they take and return protobuf messages and
raise :class:`~coord_server.errors.EtcdError`.
"""
