import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;

/**
 * pgjdbc across a schema change: N connections (the third argument, default 1) each run a query
 * prepared on the server (prepareThreshold=1), the table gains a column (over a direct
 * connection, the second argument), and each runs the same PreparedStatement ten more times, one
 * connection after the other. Prints "errors ok" for each connection: how many runs failed and
 * how many saw the new column.
 */
public class StalePlan {
    public static void main(String[] args) throws Exception {
        int count = args.length > 2 ? Integer.parseInt(args[2]) : 1;
        List<Connection> pooled = new ArrayList<>();
        try (Connection direct = DriverManager.getConnection(args[1], "postgres", "")) {
            for (int i = 0; i < count; i++) pooled.add(DriverManager.getConnection(args[0], "postgres", ""));
            String table = "stale_jdbc_" + count;
            try (Statement s = direct.createStatement()) {
                s.execute("DROP TABLE IF EXISTS " + table);
                s.execute("CREATE TABLE " + table + " (a int)");
                s.execute("INSERT INTO " + table + " VALUES (1)");
            }
            List<PreparedStatement> queries = new ArrayList<>();
            for (Connection c : pooled) queries.add(c.prepareStatement("SELECT * FROM " + table));
            for (int i = 0; i < 3; i++) {
                for (PreparedStatement query : queries) query.executeQuery().close();
            }
            try (Statement s = direct.createStatement()) {
                s.execute("ALTER TABLE " + table + " ADD COLUMN b int DEFAULT 7");
            }
            StringBuilder out = new StringBuilder();
            for (PreparedStatement query : queries) {
                int errors = 0;
                int ok = 0;
                for (int i = 0; i < 10; i++) {
                    try (ResultSet rows = query.executeQuery()) {
                        if (rows.next() && rows.getMetaData().getColumnCount() == 2 && rows.getInt(2) == 7) {
                            ok++;
                        }
                    } catch (SQLException e) {
                        errors++;
                        System.err.println(e.getSQLState() + " " + e.getMessage());
                    }
                }
                out.append(out.length() > 0 ? " " : "").append(errors).append(' ').append(ok);
            }
            System.out.println(out);
        } finally {
            for (Connection c : pooled) c.close();
        }
    }
}
