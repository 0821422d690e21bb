import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;

/**
 * pgjdbc through the pooler across a schema change: a query prepared on the server (prepareThreshold=1)
 * is run, the table gains a column (over a direct connection), and the same PreparedStatement is run ten
 * more times. Prints "errors ok": how many runs failed and how many saw the new column.
 */
public class StalePlan {
    public static void main(String[] args) throws Exception {
        try (Connection pooled = DriverManager.getConnection(args[0], "postgres", "");
                Connection direct = DriverManager.getConnection(args[1], "postgres", "")) {
            try (Statement s = direct.createStatement()) {
                s.execute("DROP TABLE IF EXISTS stale_jdbc");
                s.execute("CREATE TABLE stale_jdbc (a int)");
                s.execute("INSERT INTO stale_jdbc VALUES (1)");
            }
            PreparedStatement query = pooled.prepareStatement("SELECT * FROM stale_jdbc");
            for (int i = 0; i < 3; i++) {
                query.executeQuery().close();
            }
            try (Statement s = direct.createStatement()) {
                s.execute("ALTER TABLE stale_jdbc ADD COLUMN b int DEFAULT 7");
            }
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
            System.out.println(errors + " " + ok);
        }
    }
}
