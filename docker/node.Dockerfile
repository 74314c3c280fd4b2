# A Docker Swarm node in a container, for the multi-host e2e test (tests/e2e/multihost.py):
# Debian's own docker.io on the same offline base as the nanodist image, so the build needs only
# the Debian mirror that the base's apt already points at. Run it with /var/lib/docker on a tmpfs
# or a volume: the inner overlay2 cannot sit on the outer container's overlay root.
ARG BASE_IMAGE=nanodist-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io iproute2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY node-entrypoint.sh /usr/local/bin/
VOLUME /var/lib/docker
ENTRYPOINT ["node-entrypoint.sh"]
CMD ["--storage-driver=overlay2"]
