"""Stubs of etcd's v3 gRPC API, generated at build time by protos/etcd_stubs.py (`make etcd`)."""
