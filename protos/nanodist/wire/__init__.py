"""The tensor wire format, shared by the client, the services and the workers.

`framing` reads and writes protobuf fields by hand (no copy of tensor data);
`codec` turns numpy arrays into nanodist.v1 messages and back.
"""
