"""``chunkd demo``: a throwaway PostgreSQL (:mod:`~chunkd.demo.cluster`), a sample mailbox
sync (:mod:`~chunkd.demo.handler`), the daemon in-process and a live view
(:mod:`~chunkd.demo.view`), driven by :mod:`~chunkd.demo.command`."""
