// PostgreSQL's own scanner (libpg_query, Debian libpg-query-dev), the oracle the pooler's SQL
// lexer is tested against. Only the tests link it.
#include <stdbool.h>
#include <pg_query.h>

// The scanner reads a plain '' string with backslash escapes when this is off, as a session with
// standard_conforming_strings = off does. A thread-local in libpg_query.
extern __thread bool standard_conforming_strings;

static inline void tidepool_set_standard_conforming_strings(bool on) { standard_conforming_strings = on; }
