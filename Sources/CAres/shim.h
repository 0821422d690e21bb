// c-ares (Debian libc-ares-dev), the resolver PgBouncer uses: server host names and zone serials.
#include <ares.h>
#include <arpa/nameser.h>
