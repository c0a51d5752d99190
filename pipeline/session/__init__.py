"""The migration as sans-IO sessions: the source's and the destination's state machines.

A session imports no socket, thread, process, semaphore, signal or clock. It is told what
happened (``events``, ``destination_events``) with the time passed in, and answers with what
to do (``actions``): send, push, pause, resume, register, complete, fail. The drivers in
``pipeline.drivers`` do the I/O. ``policy`` fixes what a session may use with its peer.

    states       QEMU's state names and the tables of moves between them
    policy       PeerPolicy: our extensions, or QEMU's protocol version 1 alone
    convergence  QEMU's rule for when to switch over
    source       SourceSession
    destination  DestinationSession
"""
