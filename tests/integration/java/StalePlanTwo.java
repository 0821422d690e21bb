import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;

/**
 * Two pgjdbc connections (prepareThreshold=1) across a schema change: both run a prepared query,
 * the table gains a column (over a third, direct connection), then each runs it ten more times.
 * Prints, for each, how many runs failed and how many saw the new column: "errorsA okA errorsB okB".
 */
public class StalePlanTwo {
    static int[] runs(PreparedStatement query) throws Exception {
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
        return new int[] {errors, ok};
    }

    public static void main(String[] args) throws Exception {
        try (Connection a = DriverManager.getConnection(args[0], "postgres", "");
                Connection b = DriverManager.getConnection(args[0], "postgres", "");
                Connection direct = DriverManager.getConnection(args[1], "postgres", "")) {
            try (Statement s = direct.createStatement()) {
                s.execute("DROP TABLE IF EXISTS stale_jdbc_two");
                s.execute("CREATE TABLE stale_jdbc_two (a int)");
                s.execute("INSERT INTO stale_jdbc_two VALUES (1)");
            }
            PreparedStatement qa = a.prepareStatement("SELECT * FROM stale_jdbc_two");
            PreparedStatement qb = b.prepareStatement("SELECT * FROM stale_jdbc_two");
            for (int i = 0; i < 3; i++) {
                qa.executeQuery().close();
                qb.executeQuery().close();
            }
            try (Statement s = direct.createStatement()) {
                s.execute("ALTER TABLE stale_jdbc_two ADD COLUMN b int DEFAULT 7");
            }
            int[] ra = runs(qa);
            int[] rb = runs(qb);
            System.out.println(ra[0] + " " + ra[1] + " " + rb[0] + " " + rb[1]);
        }
    }
}
