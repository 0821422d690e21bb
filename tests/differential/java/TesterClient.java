import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.SQLWarning;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.core.BaseConnection;

/**
 * One pgjdbc client of the differential tester (tests/differential/programs.py). Arguments: the
 * JDBC URL, then startup settings as name=value (options, ApplicationName). Reads steps from
 * stdin, one per line: kind, a tab, the SQL with backslash, newline, CR and tab escaped. Writes
 * one JSON array per step: the SQL, the result (["ok", count, columns, rows] or ["error",
 * SQLSTATE]), the warnings, the reported parameters and the transaction state; then the
 * notifications received. "params" steps bind 3 to their one parameter, "prepared" steps 0, with
 * a server-side statement from the first execution (prepareThreshold=1).
 */
public class TesterClient {
    static final String[] REPORTED = {
        "application_name", "DateStyle", "TimeZone", "IntervalStyle", "standard_conforming_strings", "client_encoding"
    };

    static String json(Object o) {
        if (o == null) return "null";
        if (o instanceof Number || o instanceof Boolean) return o.toString();
        if (o instanceof List) {
            StringBuilder b = new StringBuilder("[");
            for (Object item : (List<?>) o) {
                if (b.length() > 1) b.append(',');
                b.append(json(item));
            }
            return b.append(']').toString();
        }
        StringBuilder b = new StringBuilder("\"");
        for (char c : o.toString().toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    static String unescape(String s) {
        StringBuilder b = new StringBuilder();
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '\\' && i + 1 < s.length()) {
                char n = s.charAt(++i);
                b.append(n == 'n' ? '\n' : n == 'r' ? '\r' : n == 't' ? '\t' : n);
            } else {
                b.append(c);
            }
        }
        return b.toString();
    }

    static List<Object> result(Statement statement, boolean hasRows) throws SQLException {
        List<Object> result = new ArrayList<>();
        result.add("ok");
        // Every result of a statement pgjdbc split from one string, in order.
        List<Object> results = new ArrayList<>();
        while (true) {
            if (hasRows) {
                try (ResultSet rows = statement.getResultSet()) {
                    ResultSetMetaData meta = rows.getMetaData();
                    List<Object> columns = new ArrayList<>();
                    for (int i = 1; i <= meta.getColumnCount(); i++) columns.add(meta.getColumnName(i));
                    List<Object> all = new ArrayList<>();
                    while (rows.next()) {
                        List<Object> row = new ArrayList<>();
                        for (int i = 1; i <= meta.getColumnCount(); i++) row.add(rows.getString(i));
                        all.add(row);
                    }
                    results.add(List.of(columns, all));
                }
            } else {
                int count = statement.getUpdateCount();
                if (count == -1) break;
                results.add(count);
            }
            hasRows = statement.getMoreResults();
        }
        result.add(results);
        return result;
    }

    public static void main(String[] args) throws Exception {
        Properties properties = new Properties();
        properties.setProperty("user", "postgres");
        properties.setProperty("prepareThreshold", "1");
        for (int i = 1; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            properties.setProperty(args[i].substring(0, eq), args[i].substring(eq + 1));
        }
        Connection conn;
        try {
            conn = DriverManager.getConnection(args[0], properties);
        } catch (SQLException e) {
            System.out.println(json(List.of("connect", String.valueOf(e.getSQLState()))));
            return;
        }
        List<Object> notifications = new ArrayList<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            int tab = line.indexOf('\t');
            String kind = line.substring(0, tab);
            String sql = unescape(line.substring(tab + 1));
            List<Object> result;
            List<Object> warnings = new ArrayList<>();
            try {
                if (kind.equals("params") || kind.equals("prepared")) {
                    try (PreparedStatement statement = conn.prepareStatement(sql.replace("%s", "?"))) {
                        if (sql.contains("%s")) statement.setInt(1, kind.equals("params") ? 3 : 0);
                        result = result(statement, statement.execute());
                        for (SQLWarning w = statement.getWarnings(); w != null; w = w.getNextWarning()) {
                            warnings.add(List.of(String.valueOf(w.getSQLState()), w.getMessage()));
                        }
                    }
                } else {
                    try (Statement statement = conn.createStatement()) {
                        result = result(statement, statement.execute(sql));
                        for (SQLWarning w = statement.getWarnings(); w != null; w = w.getNextWarning()) {
                            warnings.add(List.of(String.valueOf(w.getSQLState()), w.getMessage()));
                        }
                    }
                }
            } catch (SQLException e) {
                result = List.of("error", String.valueOf(e.getSQLState()));
            }
            if (conn.isClosed()) {
                System.out.println(json(List.of(sql, result, "connection lost")));
                break;
            }
            List<Object> params = new ArrayList<>();
            for (String name : REPORTED) {
                params.add(String.valueOf(((PGConnection) conn).getParameterStatus(name)));
            }
            String state = ((BaseConnection) conn).getTransactionState().toString();
            PGNotification[] got = ((PGConnection) conn).getNotifications();
            if (got != null) for (PGNotification n : got) notifications.add(List.of(n.getName(), n.getParameter()));
            System.out.println(json(List.of(sql, result, warnings, params, state)));
        }
        // Notifications still on their way are taken in before the end.
        try (Statement statement = conn.createStatement()) {
            statement.execute("ROLLBACK");
            statement.execute("SELECT pg_sleep(0.1)");
        } catch (SQLException e) {
            // a lost connection: nothing more to take in
        }
        PGNotification[] got = ((PGConnection) conn).getNotifications();
        if (got != null) for (PGNotification n : got) notifications.add(List.of(n.getName(), n.getParameter()));
        notifications.sort((a, b) -> a.toString().compareTo(b.toString()));
        System.out.println(json(List.of("notifications", notifications)));
        conn.close();
    }
}
